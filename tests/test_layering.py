"""Architecture: reading logs, estimators and evaluation never import Lightning."""

import subprocess
import sys


def test_estimators_and_evaluation_do_not_import_lightning():
    code = ("import sys, lightning_influence, lightning_influence.estimators, lightning_influence.evaluation, "
            "lightning_influence.replay, lightning_influence.log; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
