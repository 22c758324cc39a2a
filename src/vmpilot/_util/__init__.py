"""Small helpers shared by every layer: deadlines, sockets, temp dirs."""
