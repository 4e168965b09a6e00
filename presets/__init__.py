"""The built-in presets: the *.toml files beside this file (read with importlib.resources by trainer.presets).

A regular package on purpose: as a namespace package, `importlib.resources.files("presets")` merges any
other folder named presets on sys.path (e.g. one in the current directory) and, on Python 3.11, fails
outright under an editable install.
"""
