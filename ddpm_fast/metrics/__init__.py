"""Sample quality: FID, KID, precision/recall on Inception features or the digits features.

See docs/metrics.md for the conventions (uint8 quantisation, TensorFlow 1 bilinear resize,
float64 statistics, unbiased KID, k = 3 precision/recall, the digits-specific FID).
"""

from .digits import DigitsFeatures, DigitsNet, train_digits_features
from .evaluation import (compute_metrics, evaluate, extract_features, feature_network,
                         reference_statistics, to_uint8)
from .inception import InceptionFeatures, resize_bilinear_tf1
from .scores import (MetricsError, feature_statistics, frechet_distance, kernel_inception_distance,
                     load_statistics, precision_recall, save_statistics)

__all__ = ["DigitsFeatures", "DigitsNet", "InceptionFeatures", "MetricsError", "compute_metrics", "evaluate",
           "extract_features", "feature_network", "feature_statistics", "frechet_distance",
           "kernel_inception_distance", "load_statistics", "precision_recall", "reference_statistics",
           "resize_bilinear_tf1", "save_statistics", "to_uint8", "train_digits_features"]
