"""Only the C extension build hook; everything else is in pyproject.toml.

setuptools' pyproject configuration has no `cffi_modules` key (it is a setup() keyword that cffi
registers), so it lives here: obdconv/ext4/_build_fast.py compiles obdconv.ext4._fastapply
against the system libext2fs (needs gcc and libext2fs-dev; scripts/setup.sh installs them),
obdconv/oci/_build_tarscan.py compiles obdconv.oci._tarscanfast (needs only gcc), and
obdconv/formats/_build_fast.py compiles obdconv.formats._formatsfast (gcc and the system liblz4).
"""

from setuptools import setup

setup(cffi_modules=["obdconv/ext4/_build_fast.py:ffibuilder", "obdconv/oci/_build_tarscan.py:ffibuilder",
                   "obdconv/formats/_build_fast.py:ffibuilder"])
