from curate.cli import app

app(prog_name="curate")
