import os
import sys
from pathlib import Path

# Make the repository importable without installation and keep JAX on the CPU in tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
