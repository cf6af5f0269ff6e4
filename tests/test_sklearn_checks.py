from sklearn.utils.estimator_checks import parametrize_with_checks

from anomaly import LatentEBMDetector
from tests.conftest import TINY

# Every check passes; none is declared an expected failure.


@parametrize_with_checks([LatentEBMDetector(**TINY, random_state=0),
                          LatentEBMDetector(**TINY, objective="vae", contamination=0.1,
                                            random_state=0),
                          # allow_nan: the checks then also fit and score rows with NaN
                          LatentEBMDetector(**TINY, missing="mask", random_state=0)])
def test_sklearn_compatible(estimator, check):
    check(estimator)
