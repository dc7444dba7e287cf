"""ichal: cost-sensitive active labeling of intracranial hemorrhage (ICH) in head CT.

Implements Kuo et al., "Cost-Sensitive Active Learning for Intracranial Hemorrhage Detection"
(MICCAI 2018) as plain, typed functions that the MONAI Label app in apps/hemorrhage wires together.
"""

__version__ = "0.1.0"
