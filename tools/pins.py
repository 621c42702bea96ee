"""Prints the pinned requirements of pyproject.toml, one per line, for `pip install`.

    python tools/pins.py build test     # build-system requirements + the "test" extra
"""
import pathlib
import sys
import tomllib

project = tomllib.loads((pathlib.Path(__file__).parent.parent / "pyproject.toml").read_text())
pins = []
for group in sys.argv[1:]:
    if group == "build":
        pins += project["build-system"]["requires"]
    elif group == "runtime":
        pins += project["project"]["dependencies"]
    else:
        pins += project["project"]["optional-dependencies"][group]
print("\n".join(dict.fromkeys(pins)))
