// wizard pages: being written
