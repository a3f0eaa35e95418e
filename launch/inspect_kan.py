"""Plot a checkpoint's learned KAN functions and input statistics: see kan_vit/analysis/inspect_kan.py.

python launch/inspect_kan.py CHECKPOINT [--config configs/demo_digits.yaml] --out DIR
"""

import sys

from kan_vit.analysis.inspect_kan import main

if __name__ == "__main__":
    sys.exit(main())
