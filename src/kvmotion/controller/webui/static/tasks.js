// tasks pages: being written
