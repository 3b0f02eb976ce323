"""The napari plugin (`pip install "deepcad-jax[napari]"`) and `deepcad-jax view`.

napari finds the plugin through the `napari.manifest` entry point (napari.yaml beside
this file): readers for every format `data` reads, a TIFF writer, the demo's simulated
movie as sample data, and the Train, Denoise, Inspect and Stream widgets. The modules:
`layers` (lazy movie arrays, readers, writer, sample data), `work` (thread workers whose
errors become notifications), `widgets` (Train, Denoise, Stream), `inspect` (traces
with their band), `app` (the window of `deepcad-jax view` and its screenshot).

Only napari imports these modules (and `deepcad-jax view`, when napari is installed):
the core install needs neither Qt nor napari.
"""
