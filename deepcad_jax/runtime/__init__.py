"""Where the code runs: the device mesh, several processes, resources, progress, atomic
files and locks."""
