"""``chattune serve``: an OpenAI-compatible HTTP server and web chat page for trained runs.

models.py loads several runs on one base, worker.py runs the engine on its own thread,
app.py is the FastAPI app, protocol.py the OpenAI shapes its routes share, command.py the
command line; arena.py keeps battles and appends votes as Arena rows, arena_routes.py
serves them, leaderboard.py ranks the models; static/chat.html is the page.
"""
