"""Offline augmentation (S1 step 15): OpenCV-augmented copies of the training split, saved as a data set.

``python -m augment_offline --out DIR ...`` makes the set (``shards.build``);
training reads it with ``load_augmented(DIR, train=(x, y))``, which verifies
every shard's checksum and that the set was made from that training split.
"""

from augment_offline.ops import DEFAULT_OPS, OPS, Augmenter, parse_ops
from augment_offline.shards import build, check_source, load_augmented, read_manifest, read_shard

__all__ = ["DEFAULT_OPS", "OPS", "Augmenter", "parse_ops", "build", "check_source", "load_augmented",
           "read_manifest", "read_shard"]
