"""Movie file formats beyond TIFF: HDF5, Zarr, NWB, CaImAn memmaps, suite2p binaries,
raw binaries."""
