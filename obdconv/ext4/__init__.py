"""ext4 engine: the metadata pass of a conversion over the system libext2fs (see builder.py).

Public names: `Extent`, `LayerMetadata` (segment.py), `Ext4Builder` (builder.py),
`reader.tree_from_ext4` (reader.py). Importing this package loads libext2fs.so.2.
"""

from obdconv.ext4.builder import Ext4Builder
from obdconv.ext4.segment import Extent, LayerMetadata

__all__ = ["Ext4Builder", "Extent", "LayerMetadata"]
