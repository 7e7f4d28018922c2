"""The one thing pyproject.toml cannot say: the optional C kernel, and a way to leave it out.

``cloud_coordinator._fold`` (the coordinator's one-pass checked FedAvg fold, see
``cloud_coordinator/checked_sums.py``) is compiled where a C compiler with OpenMP and the
Python headers are present; where the build fails, installation goes on without it and
aggregation uses torch alone. The wheel is then tagged for this platform (stable ABI,
CPython 3.11 and newer). ``FEDGE_PURE=1`` builds a pure-Python wheel without the kernel,
for any platform: what the fedge-agent package ships (``make dist`` builds both).
"""

import os

from setuptools import Extension, setup

if os.environ.get("FEDGE_PURE") == "1":
    setup()
else:
    setup(
        ext_modules=[
            Extension(
                "cloud_coordinator._fold",
                ["cloud_coordinator/_fold.c"],
                extra_compile_args=["-O3", "-fopenmp"],
                extra_link_args=["-fopenmp"],
                py_limited_api=True,
                optional=True,
            )
        ],
        options={"bdist_wheel": {"py_limited_api": "cp311"}},
    )
