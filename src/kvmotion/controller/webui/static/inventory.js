// inventory pages: being written
