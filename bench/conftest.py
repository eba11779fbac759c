import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
