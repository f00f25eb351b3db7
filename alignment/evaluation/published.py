"""Published pairwise accuracies, so a user's numbers can sit beside them in the same layout.

From the README of RL2065/LePref (LeScore's repository), "Pairwise Accuracy of LeScore": columns
Method, Multi-dimension, Human Annotation, Pick-a-Pic v1, HPD v2, ImageRewardDB, Mean (fractions, three
decimals; "/" where a figure is not reported). And the MHP (overall) column of Kwai-Kolors/MPS's README
(percentages there, fractions here).
"""

from __future__ import annotations

# Column titles of LeScore's table, in order, and which loader layout fills each accuracy column.
LESCORE_COLUMNS = ("Method", "Multi-dimension", "Human Annotation", "Pick-a-Pic v1", "HPD v2", "ImageRewardDB", "Mean")
LAYOUT_COLUMN = {"pickapic": "Pick-a-Pic v1", "hpdv2": "HPD v2", "imagereward": "ImageRewardDB"}

# (method, multi-dimension, human annotation, Pick-a-Pic v1, HPD v2, ImageRewardDB, mean); None = "/".
LESCORE_TABLE: tuple[tuple[str, bool, bool, float | None, float | None, float | None, float | None], ...] = (
    ("CLIPScore", False, True, 0.608, 0.712, 0.543, 0.628),
    ("Aesthetic Score", False, True, 0.568, 0.726, 0.574, 0.623),
    ("HPS v1", False, True, 0.667, 0.731, 0.612, 0.67),
    ("HPS v2", False, True, 0.674, 0.833, 0.657, 0.721),
    ("PickScore", False, True, 0.705, 0.798, 0.629, 0.711),
    ("ImageReward", False, True, 0.611, 0.706, 0.651, 0.656),
    ("MPS", True, True, None, 0.835, 0.675, None),
    ("MPS_overall", False, True, 0.637, 0.838, 0.663, 0.713),
    ("VP-Score", False, False, 0.671, 0.794, 0.663, 0.709),
    ("LeScore", True, False, 0.674, 0.829, 0.642, 0.715),
)

# MPS README, "Results on different datasets", MHP (Overall), as fractions.
MPS_MHP_OVERALL = {
    "CLIP score": 0.637, "Aesthetic Score": 0.629, "ImageReward": 0.675, "HPS": 0.655, "PickScore": 0.695,
    "HPS v2": 0.655, "MPS": 0.742,
}
