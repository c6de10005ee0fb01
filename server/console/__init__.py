"""The admin console at /console: server-rendered pages of what Meta receives (pages.py),
behind one admin token (auth.py); see README, Console."""
