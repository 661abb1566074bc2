"""Prints a command line of README.md exactly as written there, for CI to run verbatim.

The README marks each command with an HTML comment (`<!-- ci:main -->`, `<!-- ci:test -->`) on the
line before its fenced code block; the block holds the one command line.

  python3 .ci/readme_commands.py main          # the whole line
  python3 .ci/readme_commands.py main install  # the part before the first ' && '
"""

import pathlib
import re
import sys

NAMES = ("main", "test")


def commands(readme: str) -> dict[str, str]:
  """{name: command line} for every name in NAMES; ValueError naming a missing or odd one."""
  found = {}
  for name in NAMES:
    match = re.search(rf"<!-- ci:{name} -->\s*\n```[^\n]*\n(.*?)\n```", readme, re.S)
    if match is None:
      raise ValueError(
        f"README.md has no '<!-- ci:{name} -->' marker before a fenced code block "
        f"holding the {name} command"
      )
    lines = [line for line in match.group(1).splitlines() if line.strip()]
    if len(lines) != 1:
      raise ValueError(f"the {name} block of README.md must hold one command line, got {lines}")
    found[name] = lines[0].strip()
  return found


def main(argv) -> None:
  if len(argv) not in (2, 3) or argv[1] not in NAMES or argv[2:] not in ([], ["install"]):
    sys.exit(f"usage: {argv[0]} {{{'|'.join(NAMES)}}} [install]")
  readme = pathlib.Path(__file__).resolve().parent.parent / "README.md"
  line = commands(readme.read_text())[argv[1]]
  print(line.split(" && ")[0] if argv[2:] else line)


if __name__ == "__main__":
  main(sys.argv)
