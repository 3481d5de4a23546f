"""Segmentation metrics, one module per family; import from the family's module.

- `isbi`: the ISBI 2012 challenge's pixel and Rand errors, V_rand and V_info (after
  membrane thinning), foreground IoU and pixel accuracy.
- `warping`: the warping error (splits and mergers, Jain et al. 2010) and the
  classification of its mismatches.
- `ctc`: the Cell Tracking Challenge's SEG and the instances it is scored on.
- `matching`: object matching as StarDist reports it: precision, recall, accuracy (AP),
  F1 and panoptic quality per IoU threshold.
- `training`: the Keras metrics reported per epoch, among them the streaming pixel error.
- `common`: what the families share: the conventions and checks of an ISBI-style pair,
  the threshold grid, `Sweep` and the label contingency table.

The evaluation metrics give the numbers of the challenges' own code;
`docs/metrics.md` has the exact definitions.
"""
