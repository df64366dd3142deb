"""Converters of published anomaly-detection data sets into the MVTec-AD layout the kit reads
(``data.py``): VisA, MPDD, BTAD, Real-IAD and MVTec AD 2.

Each takes the unpacked release (`src`) and a dataset root (`out`, new or holding other categories),
plans and checks every file before writing any, writes into a hidden sibling of `out` and renames each
category into place at the end, so an interrupted conversion leaves no half-converted category. A
category folder already in `out` is never overwritten. Masks become ground_truth/<defect>/<stem>_mask.png,
0/255. Each returns the converted categories.
"""
from __future__ import annotations

from .folders import MVTEC_AD2_NOTE, convert_btad, convert_mpdd, convert_mvtec_ad2
from .realiad import REALIAD_RESOLUTIONS, convert_realiad
from .visa import convert_visa

CONVERTERS = {
    "visa": convert_visa,
    "mpdd": convert_mpdd,
    "btad": convert_btad,
    "realiad": convert_realiad,
    "mvtec_ad2": convert_mvtec_ad2,
}

__all__ = ["CONVERTERS", "MVTEC_AD2_NOTE", "REALIAD_RESOLUTIONS", "convert_btad", "convert_mpdd",
           "convert_mvtec_ad2", "convert_realiad", "convert_visa"]
