"""Copy the cached demo models into cyclex/demo/weights (float16, inference files only).

Build them first (each script is deterministic for its seed):
    python scripts/train_demo_generators.py
    python scripts/train_phantom_classifier.py
    python scripts/build_demo_sd.py
then run this script and commit cyclex/demo/weights.
"""

from cyclex.demo.packaged import PACKAGED_DIR, package_assets

if __name__ == "__main__":
    sizes = package_assets()
    for name, size in sizes.items():
        print(f"{name}: {size / 1e6:.2f} MB")
    print(f"total {sum(sizes.values()) / 1e6:.2f} MB in {PACKAGED_DIR}")
