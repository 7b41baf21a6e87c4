import subprocess
import sys

import numpy as np


def test_peak_rss_is_the_process_own_not_its_parents():
    """A worker started by a process holding 2 GiB must not report those 2 GiB (ru_maxrss would)."""
    ballast = np.ones(2 << 30, dtype=np.uint8)  # touched: resident in this process
    code = "from amoeba_export.backends.meta import peak_rss_gb; print(peak_rss_gb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    child = float(out.stdout.strip().splitlines()[-1])
    assert 0 < child < 1.5, child
    assert ballast[-1] == 1
