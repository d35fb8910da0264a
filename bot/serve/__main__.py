"""`python -m bot.serve`: start Ray on this machine and serve the model until Ctrl-C or SIGTERM."""

import sys

from bot.serve.run import main

sys.exit(main())
