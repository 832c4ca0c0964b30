"""A trained run loaded for use: answering on the engine (``loaded``), the interactive
``chat`` command, and ``export`` of the merged model or adapter.
"""
