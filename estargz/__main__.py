import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while still importing: same one line as later
    sys.stderr.write("estargz: error: interrupted\n")
    sys.exit(130)

main(prog_name="estargz")
