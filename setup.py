"""The one compiled part: the byte-plane kernels and the zstd chunk decoder (pyproject.toml holds
everything else).

``optional``: where no C compiler is available the package installs without it and planes.py and
zstd.py use their Python form of the same rules (slower, same bytes, same errors).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mettaformat.container.codecs._planes",
            ["mettaformat/container/codecs/_planes.c", "mettaformat/container/codecs/_chunk.c"],
            depends=["mettaformat/container/codecs/_planes.h"],
            optional=True,
        )
    ]
)
