// Builds the dashboard's static assets into ../cloud/static (committed):
//   dashboard.js  = uPlot (node_modules/uplot/dist/uPlot.iife.min.js) + src/app.js + src/rollout.js
//   dashboard.css = uPlot's stylesheet + src/app.css
// No network, no bundler: plain concatenation, deterministic output.  Run: npm run build
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "cloud", "static");
const uplot = join(here, "node_modules", "uplot");
const read = (p) => readFileSync(p, "utf8");
const version = JSON.parse(read(join(uplot, "package.json"))).version;

mkdirSync(out, { recursive: true });
const js = [
  `/* edgepipe dashboard. Includes uPlot ${version} (MIT, see LICENSE.uplot.txt). */`,
  read(join(uplot, "dist", "uPlot.iife.min.js")).trim(),
  read(join(here, "src", "app.js")).trim(),
  read(join(here, "src", "rollout.js")).trim(),
  "",
].join("\n");
const css = [
  `/* edgepipe dashboard. Includes uPlot ${version} styles (MIT). */`,
  read(join(uplot, "dist", "uPlot.min.css")).trim(),
  read(join(here, "src", "app.css")).trim(),
  "",
].join("\n");
writeFileSync(join(out, "dashboard.js"), js);
writeFileSync(join(out, "dashboard.css"), css);
copyFileSync(join(uplot, "LICENSE"), join(out, "LICENSE.uplot.txt"));
console.log(`built ${out}/dashboard.js (${js.length} B), dashboard.css (${css.length} B)`);
