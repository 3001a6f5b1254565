// console pages: being written
