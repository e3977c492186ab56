"""The job: the stage runner every front end calls, its output files, the output directory's lock."""
