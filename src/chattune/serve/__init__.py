"""``chattune serve``: an OpenAI-compatible HTTP server and web chat page for trained runs.

models.py loads several runs on one base, worker.py runs the engine on its own thread,
app.py is the FastAPI app, command.py the command line; static/chat.html is the page.
"""
