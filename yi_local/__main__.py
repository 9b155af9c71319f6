import sys

try:
    from yi_local.cli import main
except KeyboardInterrupt:  # Ctrl+C in the first moments, while Python loads yi-local
    sys.exit(130)

sys.exit(main())
