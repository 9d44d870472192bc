"""Sample quality: FID, KID, precision/recall on Inception features or the digits features.

See docs/metrics.md for the conventions (uint8 quantisation, TensorFlow 1 bilinear resize,
float64 statistics, unbiased KID, k = 3 precision/recall, the digits-specific FID).
"""

from .digits import DigitsFeatures, DigitsNet, train_digits_features  # noqa: F401
from .evaluation import (compute_metrics, evaluate, extract_features, feature_network,  # noqa: F401
                       reference_statistics, to_uint8)
from .inception import InceptionFeatures, resize_bilinear_tf1  # noqa: F401
from .scores import (MetricsError, feature_statistics, frechet_distance, kernel_inception_distance,  # noqa: F401
                     load_statistics, precision_recall, save_statistics)
