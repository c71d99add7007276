"""The public entry of `make run`: one origin for the API and the web client; never exposes /internal."""
