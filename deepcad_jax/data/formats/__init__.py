"""Movie file formats beyond TIFF: HDF5, Zarr, NWB, CaImAn memmaps, Suite2p binaries, raw."""
