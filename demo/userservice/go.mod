module userservice

go 1.22
