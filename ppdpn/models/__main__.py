"""`python -m ppdpn.models`: size and cost of every published model (docs/reference.md section 2)."""
import argparse
import re

from ppdpn.models.flops import format_table
from ppdpn.models.registry import list_models

# The tiny variants are demo models, not published ones; they are left out of the table.
# Listed by family, then depth (DPN68 before DPN107).
PUBLISHED = sorted((n for n in list_models() if not n.endswith("Tiny")),
                   key=lambda n: (re.sub(r"\d", "", n), int(re.sub(r"\D", "", n))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("models", nargs="*", default=PUBLISHED,
                        help="registered model names (default: the ten published models)")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    print(format_table(args.models, args.image_size))


if __name__ == "__main__":
    main()
