"""The Wasm module fetcher: OCI images and HTTP(S) URLs -> verified modules in a shared cache -> Envoy.

* source.py       the entry for the translator: an EG `code` block -> Envoy `AsyncDataSource`
* fetcher.py      `ModuleFetcher`: pull with EG's sha256 and pullPolicy semantics
* cache.py        `ModuleCache`: the content-addressed, multi-process cache; `default_cache_dir()`
* handoff.py      a cached module to Envoy: a local file, or `ModuleServer` over HTTP
* oci.py          the OCI registry client
* bearer.py       the registry token flow: realm trust, capped reply, strict parser
* layout.py       Wasm image layouts (unpack on pull, build on push)
* http.py         HTTP(S) URL fetches
* transfer.py     options, the deadline and its watchdog, transport trust, bounded and verified reads
* binary.py       is it a WebAssembly module (structure; wasmtime's validation when installed)
* reference.py    image references and digests
* auth.py         registry credentials
* errors.py       `FetchError` and the rest, all `WasmError`

Importing this package is cheap: the modules are imported by name, so `sidecar --help` never pulls in
requests.
"""
