"""What the edge and the cloud receiver really share, and nothing else.

* ``protocol._keys`` -- the key-line format (``<key id> <base64url of 32 bytes>``), key
  files and their permission rules, and the one AEAD scheme (AES-256-GCM with a key check
  per key id) that seals the edge store's rows and the receiver's device secrets;
* ``protocol._signing`` -- request signing of the sync wire protocol v1;
* ``protocol._bundle`` -- signed chain bundles (Ed25519 manifests) the cloud sends a fleet;
* ``protocol._abi`` -- the filter ABI v1 tables and an engine-free check of a module's
  imports and exports (the cloud's, before it signs a bundle).

It sits just above :mod:`core`; the edge store and the cloud both import it, and it
imports neither.
"""
