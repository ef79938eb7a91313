from ftclip.cli import app

app(prog_name="ftclip")
