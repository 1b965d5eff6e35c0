"""The offline demo: needle-in-a-haystack data, a trained teacher, the four papers' students
distilled from it, and a report of accuracy retention and speed (`linvid demo`, `make demo`)."""
