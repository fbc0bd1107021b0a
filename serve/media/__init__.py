"""Media: encoding frames to mp4 and cover, and publishing a video's objects to S3."""
