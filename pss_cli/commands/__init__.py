"""One thin file per command: parse -> config -> call the library -> render -> exit."""
