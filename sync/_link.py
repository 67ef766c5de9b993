"""Which network link is up: interface state read from sysfs, cheaply.

``/sys/class/net/<if>/operstate`` says ``up``/``down``/``dormant``/``unknown``; ``carrier``
says whether the physical link has a carrier (``1``).  An interface counts as up when its
operstate is ``up``, or ``unknown`` with carrier 1 (PPP and some modem drivers never report
``up``).  Reading these files costs a few microseconds each, so polling them every second
is far cheaper than a netlink socket and works in every container.

Interfaces are grouped into link kinds (wifi, cellular, ethernet) by name patterns from
``sync.links.interfaces``; when several kinds are up the first in ``sync.links.prefer`` is
reported.  When no interface matches any pattern at all (a container with only ``lo``) the
link is ``unknown`` and assumed up: the probe of the receiver decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from config._models import SyncLinksConfig

__all__ = ["Link", "LinkMonitor"]


@dataclass(frozen=True)
class Link:
    kind: str  # wifi | cellular | ethernet | unknown
    interface: str | None
    up: bool
    metered: bool

    def describe(self) -> str:
        where = f" ({self.interface})" if self.interface else ""
        return f"{self.kind}{where}"


class LinkMonitor:
    """``current()`` reads sysfs and returns the link in use (or a down link)."""

    def __init__(self, cfg: SyncLinksConfig, root: Path | None = None) -> None:
        """``root`` is sysfs (``cfg.sysfs_root`` resolved by the composition root)."""
        root = Path(cfg.sysfs_root) if root is None else root
        self.net = root / "class" / "net"
        self.patterns: dict[str, list[str]] = {k: list(v) for k, v in cfg.interfaces.items()}
        self.prefer = list(cfg.prefer) + [k for k in self.patterns if k not in cfg.prefer]
        self.metered = set(cfg.metered)
        self.poll_s = float(cfg.poll_s)

    def kind_of(self, name: str) -> str | None:
        for kind in self.prefer:
            if any(fnmatchcase(name, p) for p in self.patterns.get(kind, ())):
                return kind
        return None

    def interfaces(self) -> dict[str, tuple[str, bool]]:
        """Every matching interface: name -> (kind, up)."""
        out: dict[str, tuple[str, bool]] = {}
        try:
            names = sorted(p.name for p in self.net.iterdir())
        except OSError:
            return out
        for name in names:
            kind = self.kind_of(name)
            if kind is not None:
                out[name] = (kind, self._is_up(name))
        return out

    def _is_up(self, name: str) -> bool:
        state = _read(self.net / name / "operstate")
        if state == "up":
            return _read(self.net / name / "carrier") != "0"  # absent carrier: trust operstate
        if state == "unknown":
            return _read(self.net / name / "carrier") == "1"
        return False

    def current(self) -> Link:
        found = self.interfaces()
        if not found:
            return Link("unknown", None, True, False)
        for kind in self.prefer:
            for name, (k, up) in found.items():
                if k == kind and up:
                    return Link(kind, name, True, kind in self.metered)
        return Link("unknown", None, False, False)

    def describe_down(self) -> str:
        found = self.interfaces()
        return ", ".join(f"{n} ({k}) down" for n, (k, _) in found.items()) or "no interfaces"


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(64).decode("ascii", "replace").strip()
    except OSError:
        return None
