module drover.example/worker

go 1.19
