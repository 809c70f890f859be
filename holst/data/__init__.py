"""Image-caption data: loaders, filters, built-in sets (emoji, tuxpaint, shapes) and VQGAN code shards.

Importing this package is cheap and has no side effects; the builders fetch packages only when run.
"""

from holst.data.images import BadSample, DataReport, decode_image, resize_crop
from holst.data.loaders import (
    FolderDataset,
    TableDataset,
    WebDatasetShards,
    build_dataset,
    collate,
    open_dataset,
)

__all__ = ["BadSample", "DataReport", "FolderDataset", "TableDataset", "WebDatasetShards", "build_dataset", "collate",
           "decode_image", "open_dataset", "resize_crop"]
