// events pages: being written
