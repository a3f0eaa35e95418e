"""Training curves of runs side by side: see kan_vit/analysis/plot_runs.py.

python launch/plot_runs.py runs/a runs/b --out curves.png
"""

import sys

from kan_vit.analysis.plot_runs import main

if __name__ == "__main__":
    sys.exit(main())
