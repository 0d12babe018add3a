"""The one compiled part: the byte-plane kernels (pyproject.toml holds everything else).

``optional``: where no C compiler is available the package installs without it and planes.py
uses its numpy form of the same rule (slower, same bytes).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mettaformat.container.codecs._planes",
            ["mettaformat/container/codecs/_planes.c"],
            optional=True,
        )
    ]
)
