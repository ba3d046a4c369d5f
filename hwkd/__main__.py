from hwkd.cli import app

app(prog_name="hwkd")
